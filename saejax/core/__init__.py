"""The SAE itself, pure JAX over explicit pytrees: architectures (`sae`), objectives (`losses`),
optax pieces (`optim`), the train state and jitted step (`train`), dead-latent resampling
(`resample`), input normalisation (`normalization`) and metrics (`metrics`). Nothing here reads
files or images; everything above builds on it."""
