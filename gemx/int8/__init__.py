"""INT8: one package, used by the exporter (calibrate, quantize) and the runtimes (ONNX Runtime's preparation).

    ranges.py     the range table (calibrated [lowest, highest] per quantized tensor) and its file format
    calibrate.py  the FP32 graphs run over real frames into a range table (ONNX Runtime's MinMax calibrator)
    qdq.py        the QDQ graphs from a range table: ONNX Runtime's quantizer, then gemx's passes (QDQ_PASSES)
    trt_form.py   the check that a QDQ graph is in the form TensorRT's explicit quantization takes
    ort_cpu.py    the TensorRT-form graphs rewritten for ONNX Runtime's x86 int8 kernels (`gemx build --int8`)
    graph.py      what every pass edits graphs with: producers and readers, scales, unused initializers

It sits below the exporter and the runtimes and imports neither: what it needs of the graphs is the contract
(`gemx.contract`). The design and what was tried are in docs/int8.md.
"""
