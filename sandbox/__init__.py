"""The sandbox: a zygote that forks one confined child per step, and the child side of it.

Synchronous and small on purpose; imports nothing from runnerd.
"""
