from safe_cli.cli.main import main

main()
