"""Integrations with other programs' extension points (LiteLLM's callbacks), each imported
only by the program it serves."""
