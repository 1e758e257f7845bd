"""routing: the OpenAI-compatible gateway, the router and its plugins, retries and bans, metering."""
