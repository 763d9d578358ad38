"""Checks of an exported graph against the PyTorch model it came from, and against TensorRT.

`reference.reference_run(OUT)` runs the graph on ONNX Runtime (through `ort_copy`'s verification
copy) over the run's held-out samples and compares it with the fake-quant model end to end and, with
`blockwise`, block by block. `compile_check.check_export(OUT)` runs TensorRT's (or TensorRT-RTX's)
ONNX parser and strongly typed builder over the graph for each target. verify/ may import export/
and runtime/; neither imports verify/.
"""
