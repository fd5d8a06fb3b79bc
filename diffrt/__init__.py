"""diffrt: compile diffusers checkpoints to ONNX / engines and run them torch-free.

    from diffrt import Pipeline
    pipe = Pipeline.load("out/sd15", backend="ort")
    image = pipe("a photo of a cat").images[0]

`diffrt.export(...)` needs the export extra (torch + diffusers); importing diffrt or
running a Pipeline never imports torch.
"""

__version__ = "0.1.0"


def export(*args, **kwargs):
    """Export a diffusers checkpoint to an artifact folder; see diffrt.export.export."""
    from diffrt.export import export as _export

    return _export(*args, **kwargs)


def __getattr__(name):
    if name == "Pipeline":
        from diffrt.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'diffrt' has no attribute {name!r}")


__all__ = ["Pipeline", "__version__", "export"]
