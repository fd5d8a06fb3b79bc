"""The torch-free runtime: tokenizers, schedulers, the denoising loop, backends.

Imports only numpy, tokenizers, pillow and the chosen backend's library.
"""

from diffrt.runtime.pipeline import Pipeline, PipelineOutput

__all__ = ["Pipeline", "PipelineOutput"]
