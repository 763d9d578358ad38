"""ONNX export for strongly-typed TensorRT builds, the precision audit, and the ONNX Runtime reference run.

`onnx_export.export_run(OUT)` writes OUT/model.onnx and OUT/export.json; `audit.audit(path, plan)`
reads what the graph computes in and checks it against the plan; `reference.reference_run(OUT)`
compares ONNX Runtime with the PyTorch fake-quant model and the FP32 reference in report.json.
`surgery` holds the graph passes, `graph` the index they share (the TensorRT version floor of a
graph is `quantkit.trt_requirements`, read by both export and the engine build).
"""
