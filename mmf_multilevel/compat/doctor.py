"""``mmf_ml_doctor`` / ``python -m mmf_multilevel.compat``: is MMF usable here, and how?

Imports MMF through the compatibility layer and prints each patch, whether it was
applied or found unnecessary, and the MMF file it serves. Exit status 1 if MMF does
not import or the import hook is not installed.
"""
import sys
import textwrap


def main(argv=None):
    from mmf_multilevel.compat import _bootstrap

    hooked = any(isinstance(f, _bootstrap.MMFImportHook) for f in sys.meta_path)
    if not hooked:
        print("import hook: NOT installed by the .pth file (reinstall with scripts/install.sh); installing it now")
        _bootstrap.install()
    try:
        import mmf
        import mmf_cli.run  # noqa: F401
        from mmf.common.registry import registry
    except Exception as e:  # report, do not hide
        print(f"import mmf failed: {type(e).__name__}: {e}")
        return 1
    from mmf_multilevel.compat import patches

    print(f"mmf {getattr(mmf, '__version__', '?')} from {mmf.__path__[0]}")
    for name, (state, serves) in patches.status().items():
        print(f"  {name:<36} {state:<11} " + textwrap.shorten(serves, 110))
    trainers = sorted(registry.mapping["trainer_name_mapping"])
    print(f"trainers: {', '.join(trainers)}")
    return 0 if hooked else 1


if __name__ == "__main__":
    sys.exit(main())
