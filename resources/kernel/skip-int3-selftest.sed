# int3 cannot be emulated by kvm_pvm's CPL0 emulator: do not run the boot-time int3 self-test.
s|^\tint3_selftest();$|\t/* vmm: int3_selftest() skipped (int3 is not emulated on kvm_pvm) */|
