"""Split learning of the LLM (FL-LLaMA): the client keeps the ends of the model, the server runs the middle."""
