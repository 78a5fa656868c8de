"""Integrations (a diffusers attention processor, a torch.library custom op): not written yet."""
