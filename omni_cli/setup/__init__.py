"""Getting a model ready to run: downloads and conversions, the GPU-fit check, `omni doctor`, and `prepare_model_files`."""
