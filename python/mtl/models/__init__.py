"""Models: backbones (`backbones`), the dense multi-task network (`dense`) and each benchmark's
model adapter (`multidigits`, `scenes`)."""
