"""Stage 2: trained run dirs -> ONNX models with a parity proof -> a Triton-layout model repository.

Entry points: the `exporter` command (exporter.cli) and `exporter.export.export_repository`.
"""
