"""What the tests share, beside the fixtures in tests/conftest.py. No test file imports
from another test file; they import from here.

  servers           server subprocesses: the command line, free ports, RunningServer and
                    the one ready-wait loop (wait_until, wait_until_ready)
  requests          infer_request (a ModelInfer request from images) and probabilities
  metrics           the server's /metrics scraped: scrape/metric (samples), scrape_families,
                    wait_for_no_pending
  datasets          fake MNIST / CIFAR-10 files in the real on-disk formats
  tiny_pipeline     the tiny repository made by the real trainer and exporter (needs torch)
  tiny_models       the same repository built with onnx.helper (a server-only install);
                    versioned member models and a CIFAR-size one for model control
  known_answer      a model and data set whose accuracy, confusion and calibration are known
  tls_certificates  a CA, server and client certificates generated per session
  aio_client        an asyncio channel with the client's security options
"""
