"""The REST API: typed models shared with the server, the async client, submission."""
