"""Checks of an exported graph against the PyTorch model it came from.

`reference.reference_run(OUT)` runs the graph on ONNX Runtime (through `ort_copy`'s verification
copy) over the run's held-out samples and compares it with the fake-quant model end to end and, with
`blockwise`, block by block. verify/ may import export/ and runtime/; neither imports verify/.
"""
