"""The server side: hosting a span of blocks, answering RPCs, announcing itself. Never imports client code."""
