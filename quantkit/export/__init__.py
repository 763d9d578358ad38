"""ONNX export for strongly-typed TensorRT builds and the precision audit.

`onnx_export.export_run(OUT)` writes OUT/model.onnx and OUT/export.json; `audit.audit(path, plan)`
reads what the graph computes in and checks it against the plan. `surgery` holds the graph passes,
`graph` the index they share (the TensorRT version floor of a graph is `quantkit.trt_requirements`,
read by both export and the engine build). The ONNX Runtime reference run lives in `quantkit.verify`.
"""
