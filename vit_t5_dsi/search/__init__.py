"""Search surfaces built on the checkpoint's pipeline: the Gradio app and the collection images it shows."""
