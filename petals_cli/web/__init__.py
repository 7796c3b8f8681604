"""Browser pages served by petals itself: the swarm health page (`petals swarm web`, and `/swarm` of `petals api`)
and the chat page of `petals api`.

``monitor`` reads the swarm in the background; ``health`` and ``metrics`` render a reading (pure); ``app`` puts
routes on a FastAPI app; ``static/`` holds the page's CSS and scripts, shipped in the package (no CDN, no build).
Needs the ``api`` extra (FastAPI, uvicorn).
"""
