"""Architecture search under a parameter budget (`kompakt search`): candidate shapes
(shapes.py), their measured llama.cpp speed (latency.py), the proxy-then-heal search and its
search.json (run.py), the Pareto set and the winner's reasons (pareto.py)."""
