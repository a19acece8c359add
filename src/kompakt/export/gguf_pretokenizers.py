"""llama.cpp pre-tokenizer names of the tokenizers used by the families kompakt exports.

llama.cpp picks its pre-tokenizer (how text is split before BPE) by name, stored in
`tokenizer.ggml.pre`; its converter identifies a tokenizer by sha256(str(tokenizer.encode(CHKTXT))).
These few hash -> name facts (llama.cpp, MIT licence) cover SmolLM, Llama 3, Qwen 2/3.5, GPT-2,
Mistral Nemo (tekken) and Phi; an unrecognised tokenizer is written as "default" with a note.
"""

from __future__ import annotations

# fmt: off
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501

PRE_TOKENIZERS: dict[str, str] = {
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # https://huggingface.co/Qwen/Qwen3-Embedding-0.6B
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",  # https://huggingface.co/openbmb/MiniCPM-V-4_6
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # https://huggingface.co/evilfreelancer/ruGPT3XL
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # https://huggingface.co/meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # https://huggingface.co/openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # https://huggingface.co/Qwen/Qwen1.5-7B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # https://huggingface.co/abacusai/Smaug-Llama-3-70B-Instruct
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # https://huggingface.co/mistralai/Mistral-Nemo-Base-2407
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # https://huggingface.co/HuggingFaceTB/SmolLM-135M
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # https://huggingface.co/microsoft/phi-2
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # https://huggingface.co/Qwen/Qwen3.5-9B-Instruct
}
# fmt: on
