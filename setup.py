"""Build the optional C kernel of DBAC (``clusterattn._dbac_c``); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds, and DBAC runs its tensor path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "clusterattn._dbac_c",
            sources=["src/clusterattn/_dbac_c.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
