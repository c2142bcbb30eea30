"""Control plane: lanes, the priority queue, and the router actor.

Only `scheduling.router` imports Ray; nothing here imports torch or diffusers.
"""
