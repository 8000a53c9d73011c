"""Stage 4: evaluate, query and inspect models served over the KServe v2 / Triton gRPC protocol.

Never imports torch (docs/design.md): it needs only grpc, numpy, rich, click, matplotlib and Pillow.
"""
