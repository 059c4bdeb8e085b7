from dsv2cli.cli.main import main

main()
