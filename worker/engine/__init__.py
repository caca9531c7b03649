"""The GPU engine: what renders an image, and nothing about queues.

Detection and the card's facts, profile specs and how they are applied, native fp8 layers and the
hand-written kernels (`kernels/`), pipeline loading and model sources, the diffusers and simulated
renderers, the tiny random-weight model, fetching weights. torch is imported only inside the modules
that compute (never by importing this package); no module here imports celery, kombu or redis
(tests/test_import_boundaries.py).
"""
