"""Pure tensor math (no transformers import): quantization grids, GPTQ, pruning scores, SVD, losses."""
