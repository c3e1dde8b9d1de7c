"""Integrations with other libraries' models, each imported only when used (``fusedstab.integrations.
transformers`` imports transformers; nothing here is imported by ``import fusedstab``)."""
