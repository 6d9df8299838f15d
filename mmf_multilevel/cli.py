"""``mmf_ml_run`` / ``python -m mmf_multilevel.cli``: MMF's ``mmf_run`` through our launcher.

The stock ``mmf_run`` behaves the same once the package is installed (its import
hook routes it here); this entry point also works where the ``.pth`` hook is absent,
and is the module to give ``torchrun -m``.
"""
import sys


def run(opts=None, predict=False):
    from mmf_multilevel.compat import install

    install()
    import mmf  # noqa: F401  (applies the compatibility patches, registers our components)

    from mmf_multilevel.compat import launcher

    return launcher.run(opts, predict=predict)


def predict(opts=None):
    if opts is None:
        sys.argv.append("evaluation.predict=true")
    else:
        opts = list(opts) + ["evaluation.predict=true"]
    return run(opts, predict=True)


if __name__ == "__main__":
    run()
