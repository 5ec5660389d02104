"""A Hugging Face Space (Gradio SDK) or ``python app.py``: the live sliders of ``dblend ui`` on
the shipped fashion experts (the Space installs this repository with its ``ui`` extra)."""

from diffusion_blend.ui import build_app, make_session

demo = build_app(make_session(), allow_extrapolation=False)

if __name__ == "__main__":
    demo.launch()
