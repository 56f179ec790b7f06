from bench.reproduce.run import main

main()
