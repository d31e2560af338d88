from cotune.cli.main import main

main()
