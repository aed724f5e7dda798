"""hwport's conformance suite for backend plugins.

    pytest --pyargs hwport.conformance --hwport-backend NAME [--hwport-report out.json]
                                                             [--hwport-xfail known.txt]
    hwport conformance NAME [--report out.json] [--xfail known.txt]

It checks that the spec is valid and sourced, that every format it declares rounds
correctly (against ml_dtypes where it is one of the formats ml_dtypes knows, else against
the format's definition), and that the built-in pipelines reach an outcome in inference
and in (short) training on the backend.
"""
