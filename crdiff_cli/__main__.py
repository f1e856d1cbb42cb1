from crdiff_cli.cli import main

main()
