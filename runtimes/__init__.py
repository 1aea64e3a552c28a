"""Backends that run artifacts (native, llama.cpp, onnxruntime) behind one small protocol."""
