"""hellomeme: animate a portrait with a driving video's head motion and expressions (HelloMeme v1)."""

__version__ = "0.1.0"
