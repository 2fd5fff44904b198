"""Layer 0, the foundations every other layer stands on: the one error type, the registry type and plugin
loading, atomic writes, the safetensors header schema, self-describing checkpoints and model specs.

May import: nothing of qvec (only the standard library, torch, safetensors).
"""
