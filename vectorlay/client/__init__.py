"""The CLI's side of the API: config contexts, the API client and output formatting."""
