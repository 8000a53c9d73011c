"""Stage 1 of the pipeline: train MNIST / CIFAR-10 CNNs (and ensembles) into run dirs.

Modules, in the order data flows through them:
  recipes      hyperparameter presets, one dict per architecture, and the values each option may take
  models       the networks (lenet, mnist_cnn, cifar_cnn, airbench)
  data         normalization, validation split, in-memory augmentation and batching
  environment  device, DDP rank, autocast precision, determinism
  optim        optimizer parameter groups, the learning-rate schedule, Lookahead
  muon         the Muon optimizer (orthogonalized updates for conv filters)
  objective    what a run minimizes: cross-entropy (the interface the loop calls)
  train        one run: set up, resume, the epochs, the final evaluation
  teacher      distillation's teacher: an exported ONNX model or ensemble run by onnxruntime, its cache
  distill      the knowledge-distillation objective and the teacher's targets for it
  serving      ServingModel: uint8 NHWC images in, probabilities out (what gets exported)
  checkpoint   the run dir contract: the one reader of config.json, load_serving_model
  report       curves, confusion matrix, per-class table, the progress display
  errors       TrainerError, TrainingInterrupted
  cli_options  the options `train` and `distill` share
  cli          the `trainer` command
"""
