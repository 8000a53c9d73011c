"""The models: from the repository's folders to loaded, leased versions.

  repository.py  scan the repository, parse config.pbtxt, versions, load order
  runtime.py     onnxruntime sessions: providers (CPU/CUDA), session options, signature checks
  warmup.py      config.pbtxt model_warmup (or one automatic warm-up) before a model serves
  registry.py    the loaded models by name and version, leased per request
  ensemble.py    platform "ensemble": its steps, each member through its own batcher
  loading.py     build one model version (session, batcher, answers); load at start-up
  control.py     load / reload / unload while serving: modes none, poll, explicit

May import scheduling, observability and the base modules; not inference, transport or process.
"""
