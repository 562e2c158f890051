"""poc_api: a trio-native client for stateful LLM inference over salience gRPC."""
