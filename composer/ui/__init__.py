"""The Zoo Composer web app (Gradio). `build_app(config)` makes it, `launch(demo, ...)` serves it."""
from composer.ui.app import build_app, default_config, launch

__all__ = ["build_app", "default_config", "launch"]
