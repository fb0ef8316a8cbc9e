"""Software updates, server side: the artifact store (``artifacts``), SBOM parsing (``sbom``) and
the TUF repository that signs what devices may install (``tuf_repo``). ADR 0011."""
