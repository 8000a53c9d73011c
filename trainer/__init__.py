"""Stage 1 of the pipeline: train MNIST / CIFAR-10 CNNs (and ensembles) into run dirs.

Modules, in the order data flows through them:
  recipes     hyperparameter presets, one dict per architecture
  models      the networks (lenet, mnist_cnn, cifar_cnn, airbench)
  data        normalization, validation split, in-memory augmentation and batching
  train       the training loop (one run), DDP, resume, final evaluation
  checkpoint  the run dir contract: ServingModel and load_serving_model
  report      curves, confusion matrix, per-class table
  cli         the `trainer` command
"""
