"""GPU side: the diffusers pipeline, the worker deployment, and the tiny offline model.

Torch and diffusers are imported only inside this package.
"""
