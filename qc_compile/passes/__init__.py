"""Graph passes over onnx-graphsurgeon graphs (one job each, graph -> graph).

* :func:`~qc_compile.passes.fold_smoothing.pass_fold_smoothing` — per-channel smoothing folded exactly;
* :func:`~qc_compile.passes.rotate.pass_rotate` — blocked Hadamard rotation (offline on weights, online on x);
* :func:`~qc_compile.passes.insert_qdq.pass_insert_qdq` — weight / activation Q/DQ from the plan;
* :func:`~qc_compile.passes.plugin_nodes.pass_plugin_nodes` — opt-in ``qc::`` plugin nodes;
* :func:`~qc_compile.passes.ort_twin.pass_ort_twin` — replaces TensorRT-only ops by standard ONNX that
  onnxruntime runs, for numerical checks;
* :func:`~qc_compile.passes.cast_precision.pass_cast_precision` — the float32 Q/DQ graph in the target's half type
  (bf16/fp16) outside documented float32 exceptions (the graph TensorRT builds);
* :func:`~qc_compile.passes.dtype_audit.audit` — not a rewrite: every op's compute dtype, checked against the plan.
"""
