//! `blk-break`: a broken driver. Publishes an impossible available index on the first
//! virtio-blk disk and passes only if the device answers by asking for a reset (status
//! DEVICE_NEEDS_RESET, announced with a configuration-change interrupt), wherever it runs.

#![no_std]
#![no_main]

use splitvisor_guest_kit::virtio::{self, BlockDevice, blk};
use splitvisor_guest_kit::{Boot, Line, apic, guest_main};

guest_main!(main);

fn main(boot: &Boot) -> Result<(), &'static str> {
    let info = boot.start_info.as_ref().ok_or("no hvm_start_info")?;
    apic::mask_pic();
    apic::enable_local();
    let device = virtio::block_devices(info.cmdline()).next().ok_or("no virtio-blk disk on the command line")?;
    let mut disk = BlockDevice::init(device, 0)?;
    let mut id = [0u8; 20];
    if disk.request(blk::GET_ID, 0, id.as_mut_ptr(), 20)? != blk::OK {
        return Err("GET_ID failed");
    }
    disk.break_queue();
    match disk.wait() {
        Err(why) => {
            Line::new().str("blk-break: the device answered a broken queue with: ").str(why).print();
            Ok(())
        }
        Ok(_) => Err("the device served a broken queue"),
    }
}
