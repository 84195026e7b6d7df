from hellomeme_cli.cli import main

main()
