from gemx.cli import main

main()
