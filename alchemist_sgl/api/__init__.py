"""The HTTP process: routes, schemas, auth guards, metrics text and the control queue to the scheduler."""
